"""Outgoing and incoming Standard Webhooks: signing, verification, outbox sender."""
