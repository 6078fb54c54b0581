"""Campaign files, both formats (ISCA key/value, columnar CSV), and random campaigns."""

from faultlab.campaigns.files import (COLUMNS, FAULT_COLUMNS, ISCA_KEYS, WORKLOAD_COLUMNS,
                                      Campaign, campaign_digest, decode, detect_format,
                                      format_columnar, load_campaign, parse_campaign,
                                      parse_columnar, parse_isca)

__all__ = ["COLUMNS", "FAULT_COLUMNS", "ISCA_KEYS", "WORKLOAD_COLUMNS", "Campaign",
           "campaign_digest", "decode", "detect_format", "format_columnar", "load_campaign",
           "parse_campaign", "parse_columnar", "parse_isca"]
