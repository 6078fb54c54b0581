"""Bundles: a campaign, its golden runs and its results as one verifiable `.tar.gz`
(docs/bundles.md). `pack.make_bundle` writes one deterministically; `fetch.fetch` downloads one
(gdown), verifies every member against the manifest, extracts it without trusting it
(`extract.verify_extract`) and installs its golden runs where the fingerprints match.
Framework-free; nothing in a bundle is ever imported, executed or unpickled."""

from faultlab.bundles.manifest import BundleError

__all__ = ["BundleError"]
