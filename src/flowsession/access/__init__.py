"""Access: identities and the secrets they hold."""
