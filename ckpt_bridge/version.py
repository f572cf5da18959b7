"""The package version, in a leaf module so code that records it (the to-dcp manifest) need not import the
package facade ``ckpt_bridge/__init__.py`` (which imports the commands)."""

__version__ = "0.1.0"
