"""Thin adapters that call the ckpt-bridge pipeline from inside trainers
(installed as ``ckpt_bridge.integrations``).  No format logic lives here."""
