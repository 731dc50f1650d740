"""
Bridges: quebert seen from other frameworks.

Each subpackage lets an application built on another framework publish
tasks to quebert workers and read their state, from that framework's own
event loop, without running Twisted there.  They are optional extras
(``pip install quebert[guillotina]``) and import nothing until used.
"""
