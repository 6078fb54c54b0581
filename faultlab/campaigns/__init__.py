"""Campaign files, both formats (ISCA key/value, columnar CSV; docs/formats.md), and random
campaigns; every problem is a one-line CampaignError naming the file, row and column."""

from faultlab.campaigns.columnar import (COLUMNS, FAULT_COLUMNS, WORKLOAD_COLUMNS,
                                         format_columnar, parse_columnar, write_columnar)
from faultlab.campaigns.isca import ISCA_KEYS, parse_isca
from faultlab.campaigns.load import (MAX_FILE_BYTES, Campaign, campaign_digest, decode,
                                     detect_format, load_campaign, parse_campaign)

__all__ = ["COLUMNS", "FAULT_COLUMNS", "ISCA_KEYS", "MAX_FILE_BYTES", "WORKLOAD_COLUMNS",
           "Campaign", "campaign_digest", "decode", "detect_format", "format_columnar",
           "load_campaign", "parse_campaign", "parse_columnar", "parse_isca", "write_columnar"]
