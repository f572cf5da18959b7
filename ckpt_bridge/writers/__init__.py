"""Sink writers.  Each writes into a temporary sibling directory and renames it
into place at the end (:class:`~ckpt_bridge.pipeline.atomic.AtomicDir`)."""
