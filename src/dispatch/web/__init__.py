"""The monitor: a JSON API and a static page over the same services as the CLI (SPEC §8)."""
