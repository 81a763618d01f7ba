"""Model adapters: everything MosaicDiff knows about a model library's classes and module layout.

One module per model family, each providing a `mosaicdiff.integrations.base.ModelAdapter`, so that
the method (`mosaicdiff.calibrate`, `mosaicdiff.compact`, `mosaicdiff.pruning`) only ever sees
blocks, `nn.Linear` layers and tensors. `mosaicdiff.models` pairs each adapter with the runtime
class its stages are built into; docs/adding_a_model.md describes how to add a family.

- `mosaicdiff.integrations.base`: the adapter interface (`ModelAdapter`, `PrunableGroup`).
- `mosaicdiff.integrations.diffusers_dit`: diffusers' ``DiTTransformer2DModel`` (`DiTAdapter`).
- `mosaicdiff.integrations.schedulers`: diffusers schedulers (training ``alphas_cumprod``, the
  timesteps a sampler visits, the default DDIM).

diffusers is also imported by the runtime model (`mosaicdiff.mosaic`, a diffusers ``ModelMixin``),
by `mosaicdiff.serialization` (its version, in the saved config) and by the app layer.
"""
