"""The offline CommonPool: a real, noisy image-text pool built from data installed on this machine.

`build_offline(OfflinePoolConfig(out=...))` (CLI: `curate pool build-offline`) writes DIR/www/ images,
DIR/urls.parquet (url, text), DIR/truth.parquet (what noise each row carries), DIR/evalsets/ (held-out
splits) and DIR/pool_build.json. `curate pool serve DIR` then serves it as a stand-in for the web.
"""
