"""Calls to the systems behind the agent (CRM, calendar, ticketing): breakers, webhooks.

A leaf package: nothing here imports the PBX, call or runtime layers.
"""
