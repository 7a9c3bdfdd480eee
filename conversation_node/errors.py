"""Why a node stops serving a call."""


class CallDropped(Exception):
    """The session can no longer serve the call (fenced out, ended, link lost); close its
    link and let the router decide where the call goes."""
