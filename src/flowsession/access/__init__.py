"""Access: identities and the secrets they hold."""

USER_IDENTITY = "user"  # the user's own identity; managed identities get their own names
MASK = "******"  # what a connection's secret shows as
