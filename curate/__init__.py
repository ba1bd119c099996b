"""curate: DataComp-style image-text dataset curation and benchmarking.

Data flow (each stage is a module, each a CLI subcommand):
urls.parquet -> download -> POOL -> embed -> filter --recipe -> SUBSET -> reshard -> train -> evaluate -> submit
"""

__version__ = "0.1.0"
