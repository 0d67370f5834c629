"""Escalation: SLA deadlines over business-hours calendars, and the timers that fire them.

`gateway.escalation.calendar` holds the pure calendar arithmetic.
"""
