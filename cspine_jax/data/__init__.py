"""Input pipeline: converted studies (manifest.jsonl + TensorStore zarr3) -> Grain batches.

Entry points (see each module's docstring):
  pipeline.make_train_iterator(config, process_index, process_count, start_step=0)
      -> (checkpointable iterator of process-local numpy batches, number of training studies)
  pipeline.make_eval_iterator(config, split='eval', uids=None, process_index, process_count)
      -> (iterator over every study once, padded last batch with "mask", number of studies)
  pipeline.to_global(batch, NamedSharding(mesh, P('data'))) -> global jax.Arrays
  manifest.load_manifest(root) -> [Study]; manifest.select(...); manifest.stratified_folds(...)
  transforms.make_region_crop / make_vertebra_crops: the crops, usable without Grain.
Keys: config.py (``config.data``; ``resolve`` fills defaults). Modules are imported lazily by
their users so that ``import cspine_jax.data`` stays cheap.
"""
