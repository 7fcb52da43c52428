"""The application layer: everything a command needs around the library.

Loading pipelines and choosing threads (:mod:`.runner`), run folders and
manifests (:mod:`.runfolder`), config files (:mod:`.config`), PNG parameters
(:mod:`.pngmeta`), sweeps (:mod:`.sweep`, :mod:`.reweight_sweep`). The CLI
(:mod:`xattn.cli`) sits on top. The library (hooks, controllers, maps, edit,
the shapes world) never imports from here; ``tests/test_layers.py`` checks it.
"""
