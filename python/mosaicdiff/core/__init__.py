"""What every model family shares: the adapter interface, stages, the MosaicModel base, save/load,
the stage runtime and CUDA graphs, samplers, distributed calibration and sharded sampling."""
