"""Built-in backbones: CIFAR ResNets (``cifar_resnet``), small-input torchvision networks
(``torchvision_nets``) and ``timm:<name>`` (``timm_nets``).

Every factory is ``factory(num_classes, input_shape, **params) -> StagedBackbone``;
``timm:`` is a prefix factory called as ``factory(suffix, num_classes, input_shape, **params)``.
They are registered lazily by ``eebench_plugins.manifests.backbones``; this package imports
nothing, so that loading one of them loads no other (torchvision only for its networks).
"""
