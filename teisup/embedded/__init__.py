"""The embedded backend: a TEI-compatible gRPC server computing real embeddings.

``python -m teisup.embedded --model-id ... --port ...`` takes TEI 1.9.3's router
flags and speaks its ``tei.v1`` gRPC protocol, with sentence-transformers on
PyTorch doing the work, so teisup runs on machines with no TEI binary. The
manager launches it exactly as it launches TEI (`teisup.instances.resolve_launcher`).

* `cli`: the command line and its environment variables;
* `models`: offline model resolution (directory, HF cache, packaged model);
  its `hub_cache_dir` and `repo_folder` are the cache lookup `teisup.models` shares;
* `engine`: the model, tokenization and forward passes;
* `batcher`: TEI-style token-budget batching, inference in a worker thread;
* `server` and `service`: the gRPC server and the ``tei.v1`` services,
  health and reflection;
* `metrics`: the ``te_*`` Prometheus exporter;
* `app`: start-up, serving and shutdown.

Importing this package does not import torch; only loading a model does.
"""

from .app import main
from .models import hub_cache_dir, repo_folder

__all__ = ["hub_cache_dir", "main", "repo_folder"]
