"""Software-defined assets, one module per stage of the lineage."""

from ca_platform.assets.downloads import downloaded_shard
from ca_platform.assets.pool import raw_pool_shard

SPINE_ASSETS = [raw_pool_shard, downloaded_shard]
