from promptflow.connections import CustomConnection
from promptflow.core import tool


@tool
def greet(conn: CustomConnection, text: str) -> str:
    # conn.secrets["api_key"] is available too; never return it.
    return conn.configs["greeting"] + " " + text
