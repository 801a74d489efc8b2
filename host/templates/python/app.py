import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import Decision_Drop, Decision_Keep, Info, Kind

config = {"min_chars": 10}


class Plugin(exports.Plugin):
    def describe(self) -> Info:
        schema = {"type": "object", "additionalProperties": False,
                  "properties": {"min_chars": {"type": "integer", "default": 10}}}
        return Info(id="{{name}}", version="0.1.0", description="Drops documents shorter than min_chars",
                    kinds=[Kind.FILTER], config_schema=json.dumps(schema))

    def configure(self, text: str) -> None:
        given = json.loads(text)
        for key, value in given.items():
            if key != "min_chars" or not isinstance(value, int):
                raise Err(f"unknown key or wrong type: `{key}`")
            config[key] = value


class Filter(exports.Filter):
    def filter_batch(self, docs) -> list:
        return [
            Decision_Drop("too_short")
            if sum(1 for c in d.text if not c.isspace()) < config["min_chars"]
            else Decision_Keep()
            for d in docs
        ]
