"""A TCP relay on loopback that runs the sans-IO Kafka processor (stand-in for Envoy).

Theory of operation
-------------------
Each accepted client connection gets its own upstream connection to the broker
and its own `KafkaConnection`; two tasks pump bytes (client -> processor ->
broker, broker -> processor -> client). A close action from the processor, or
EOF on either side, closes both. The relay's identity and policy are fixed per
relay: a test runs one relay per client identity, each telling the broker's
clients (through ``advertised_broker``) to come back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from flagella.policy.mapstate import L7Policy
from flagella.proxy.kafka import (
    KafkaAccessRecord,
    KafkaCodec,
    KafkaConnection,
    KafkaOutput,
    KafkaSettings,
    TopicIds,
)


@dataclass
class RelayLog:
    records: list[KafkaAccessRecord] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)
    connections: int = 0


class KafkaRelay:
    """Relay ``127.0.0.1:port`` -> broker; started in its own event loop thread."""

    def __init__(
        self, broker: tuple[str, int], identity: int, policy: L7Policy | None,
        codec: KafkaCodec, topic_ids: TopicIds | None = None,
        local_addr: str | None = None,
    ) -> None:
        self.broker = broker
        #: Source address of the upstream connections (a plain relay in front of Envoy
        #: gives each client pod its own loopback address).
        self.local_addr = local_addr
        self.identity = identity
        self.policy = policy  # None: plain relay, no processor
        self.codec = codec
        self.topic_ids = topic_ids or TopicIds()
        self.log = RelayLog()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> KafkaRelay:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _processor(self) -> KafkaConnection | None:
        if self.policy is None:
            return None
        settings = KafkaSettings(advertised_broker=("127.0.0.1", self.port))
        return KafkaConnection(
            self.identity, self.policy, codec=self.codec, topic_ids=self.topic_ids,
            settings=settings,
        )

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.log.connections += 1
        try:
            broker_r, broker_w = await asyncio.open_connection(
                *self.broker, local_addr=(self.local_addr, 0) if self.local_addr else None
            )
        except OSError:
            client_w.close()
            return
        processor = self._processor()

        def close(reason: str) -> None:
            self.log.closes.append(reason)
            client_w.close()
            broker_w.close()

        def deliver(out: KafkaOutput) -> bool:
            if out.to_broker:
                broker_w.write(out.to_broker)
            if out.to_client:
                client_w.write(out.to_client)
            self.log.records.extend(out.records)
            if out.close is not None:
                close(out.close)
                return False
            return True

        async def pump(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
            feed: Callable[[bytes], KafkaOutput] | None,
        ) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(256 * 1024):
                    if feed is None:
                        writer.write(data)
                    elif not deliver(feed(data)):
                        return
                    await writer.drain()
            writer.close()

        await asyncio.gather(
            pump(client_r, broker_w, processor.receive_from_client if processor else None),
            pump(broker_r, client_w, processor.receive_from_broker if processor else None),
            return_exceptions=True,
        )
        for w in (client_w, broker_w):
            w.close()
