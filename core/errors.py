"""The one exception type whose message is shown to the user as is."""


class UserError(Exception):
    """A problem the user can fix (bad params, missing package, unreachable server).

    Its message is one sentence that says what is wrong and what to do; stage entry points
    print it as ``error: <message>`` and exit with status 2, without a traceback.
    """
