"""Parses a Prometheus text exposition from stdin with the Prometheus project's own parser
(prometheus_client) and prints its families as JSON: the metrics test asserts on that, so
the text is checked by a real parser rather than by our own regexes."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

families = []
for family in text_string_to_metric_families(sys.stdin.read()):
    families.append(
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [
                {"name": s.name, "labels": s.labels, "value": s.value}
                for s in family.samples
            ],
        }
    )
json.dump(families, sys.stdout)
