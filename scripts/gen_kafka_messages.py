"""Regenerate src/flagella/proxy/kafka/messages.json from Kafka's message definitions.

    python scripts/gen_kafka_messages.py [DEFINITIONS_DIR]

DEFINITIONS_DIR defaults to ../shared/schemas/kafka/message (Apache Kafka's
clients/src/main/resources/common/message). The output keeps every definition
whole, minus comments and ``about`` texts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flagella.proxy.kafka._schema import compact_definitions

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "flagella" / "proxy" / "kafka" / "messages.json"


def render(directory: Path) -> str:
    texts = [p.read_text("utf-8") for p in sorted(directory.glob("*.json"))]
    return json.dumps(compact_definitions(texts), separators=(",", ":"), sort_keys=True) + "\n"


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".." / "shared" / "schemas" / "kafka" / "message"
    OUT.write_text(render(directory), "utf-8")
    print(f"wrote {OUT} from {directory}")


if __name__ == "__main__":
    main()
