def get_ip() -> str:
    """The stand-in serves on the loopback interface only."""
    return "127.0.0.1"
