"""Smallest version-guarded monkeypatches for trainers without a hook
(installed as ``ckpt_bridge.patches``).  Each names the upstream versions it
was tested against and refuses others."""
