#!/usr/bin/env python3
"""Print the first non-null of the given dotted keys from `smolbox config` output on stdin (stdlib only, no yaml):
    smolbox config | python3 scripts/config_value.py export.name run.name
The output is yaml.safe_dump of two-level sections with plain scalars; names are [A-Za-z0-9._-]."""

import re
import sys

values: dict[str, str] = {}
section = None
for line in sys.stdin.read().splitlines():
    top = re.match(r"^([A-Za-z_]\w*):\s*$", line)
    if top:
        section = top.group(1)
        continue
    field = re.match(r"^  ([A-Za-z_]\w*):\s*(.*?)\s*$", line)
    if field and section:
        value = field.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[f"{section}.{field.group(1)}"] = value
for key in sys.argv[1:]:
    value = values.get(key)
    if value not in (None, "", "null", "~"):
        print(value)
        sys.exit(0)
sys.exit(f"config_value: none of {', '.join(sys.argv[1:])} is set in the config")
