"""Test helpers that ship with moco-zoo (used by the test suite and the offline demo).

- :class:`LocalHubServer`: a small Hugging Face Hub look-alike on 127.0.0.1 that the real ``huggingface_hub`` client can
  create repos in, upload to (preupload, LFS batch, ndjson commit) and download from (resolve, repo info, tree).
- :func:`hub_client_pointed_at`: point an already imported ``huggingface_hub`` (and so timm's ``hf-hub:`` loader) at such
  an endpoint, with offline mode and Xet switched as asked, and restore everything afterwards.
"""
from .hub_server import LocalHubServer, hub_client_pointed_at

__all__ = ["LocalHubServer", "hub_client_pointed_at"]
