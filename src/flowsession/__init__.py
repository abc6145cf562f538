"""flowsession: self-hosted compute sessions for prompt flow.

    from flowsession import Client
    run = Client().run(flow="my_flow", data="data.jsonl", column_mapping={"q": "${data.q}"})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]

if TYPE_CHECKING:
    from flowsession.client import Client


def __getattr__(name: str) -> Any:  # the SDK loads on first use: the CLI never pays for it
    if name == "Client":
        from flowsession.client import Client

        return Client
    raise AttributeError(name)
