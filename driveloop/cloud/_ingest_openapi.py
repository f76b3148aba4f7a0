"""OpenAPI descriptions of the ingest server's request bodies (private to ``cloud.ingest``).

The ingest reads its bodies itself (size- and depth-bounded, then checked by the service), so FastAPI
cannot derive their schemas; these describe them for clients and for the API fuzz run. They state what
a well-formed request looks like; the service still checks everything, whatever the schema says.
"""

from __future__ import annotations

from typing import Any

from driveloop.cloud.campaigns import MAX_WINDOW_S, PRIORITY_RANGE, TRIGGER_MODES
from driveloop.contracts.upload import CHUNK_CONTENT_TYPE, OFFSET_HEADER, UPLOAD_NAME_MAX_CHARS


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


UPLOAD_BODY = _json_body({
    "type": "object", "additionalProperties": False, "required": ["sha256", "size", "name"],
    "properties": {
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "size": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "minLength": 1, "maxLength": UPLOAD_NAME_MAX_CHARS},
    },
})

CAMPAIGN_BODY = _json_body({
    "type": "object", "additionalProperties": False, "required": ["name", "condition"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,53}$"},
        "condition": {"type": "string", "minLength": 1, "maxLength": 500},
        "trigger_mode": {"enum": list(TRIGGER_MODES)},
        "min_interval_s": {"type": "number", "minimum": 0},
        "pre_window_s": {"type": "number", "minimum": 0, "maximum": MAX_WINDOW_S},
        "post_window_s": {"type": "number", "minimum": 0, "maximum": MAX_WINDOW_S},
        "priority": {"type": "integer", "minimum": PRIORITY_RANGE[0], "maximum": PRIORITY_RANGE[1]},
        "expires_at_s": {"type": ["number", "null"], "minimum": 0},
    },
})

CHUNK_BODY = {
    "parameters": [{"name": OFFSET_HEADER, "in": "header", "required": True,
                    "schema": {"type": "integer", "minimum": 0}}],
    "requestBody": {"required": True, "content": {CHUNK_CONTENT_TYPE: {"schema": {"type": "string",
                                                                                  "format": "binary"}}}},
}
