"""Light manifests of the built-in plugins: the modules the ``eebench`` entry points name.

Each holds one plugin's parameter models (pydantic only) and its register hooks, which register
lazy references (``eebench.lazy.lazy``) to the implementations: loading every built-in plugin,
as ``eebench plugins`` and ``eebench validate`` do, imports no torch, torchvision, timm, fvcore or
scipy. The implementation modules (``eebench_plugins.sdn`` ...) import their models from here.
"""
