"""probe: cached-feature linear probes, few-shot heads and similarity search on pretrained vision backbones."""

__version__ = "0.1.0"
