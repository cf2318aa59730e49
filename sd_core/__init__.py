"""emoji-sd's library: one folder per pipeline stage, over a storage layer.

Layers, lowest first (a module imports only from its own layer or lower ones; ``tests/test_layers.py``
checks it):

* ``common``, ``store``: config base, images, devices, plots; catalog, atomic files, lock, stage
  records, tensor cache, the dataset table
* ``ingest``: crawl (browser listing, downloads, ledger) and convert
* ``caption``: the captioners and the caption stage
* ``vae``: the offline default VAE trained on the dataset
* ``encode``: VAE latents and text states, cached; the pairs training reads
* ``diffusion``: model factory, schedulers, generation, exports (diffusers classes)
* ``training``: the trainer, its checkpoints, and the train stage
* ``sample``, ``eval``: the stages that use a trained model
* ``report``: the report page
* ``config``, ``status``: the whole pipeline's configuration, and what each stage has on disk
"""
