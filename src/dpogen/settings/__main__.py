"""python -m dpogen.settings: the configuration's JSON schema, generated from the typed sections."""
import json

from . import schema

print(json.dumps(schema(), indent=1))
