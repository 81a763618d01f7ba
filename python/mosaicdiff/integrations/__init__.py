"""Adapters to third-party model libraries.

Everything MosaicDiff knows about a library's classes and module layout lives here, one module
per model family, so that the pruner (`mosaicdiff.obs`, `mosaicdiff.compact`) and the runtime
(`mosaicdiff.blocks`) only ever see plain tensors and `nn.Linear` layers.

- `mosaicdiff.integrations.diffusers_dit`: diffusers' ``DiTTransformer2DModel`` (the only module
  of the package that imports diffusers).
"""
