"""
Permissions and roles of the add-on (scanned by ``includeme``).

``guillotina.ManageAMQP`` (list, read and cancel a container's tasks) and
``guillotina.DebugAMQP`` (see a task's message) are guillotina_amqp's, so
roles and grants written for it keep working; both are given to
``guillotina.Manager``.  ``quebert.RunTask`` is what a task's callback
endpoint requires: the role ``quebert.Worker`` has it, and the service
principal (authenticated by the service token, see ``auth.py``) has that
role everywhere.  The role also has ``guillotina.AccessContent``, which
Guillotina's traversal asks of every request to a view not declared
``allow_access``: without it no callback endpoint could be reached.
"""

from guillotina import configure

MANAGE_AMQP = "guillotina.ManageAMQP"
DEBUG_AMQP = "guillotina.DebugAMQP"
RUN_TASK = "quebert.RunTask"
WORKER_ROLE = "quebert.Worker"

configure.permission(MANAGE_AMQP, "List, read and cancel the tasks of a container")
configure.permission(DEBUG_AMQP, "See the message (arguments, context) of a task")
configure.permission(RUN_TASK, "Call the endpoints quebert URL tasks call back")

configure.role(WORKER_ROLE, "quebert worker",
               "The workers calling back into the application for URL tasks", local=False)

configure.grant(permission=MANAGE_AMQP, role="guillotina.Manager")
configure.grant(permission=DEBUG_AMQP, role="guillotina.Manager")
configure.grant(permission=RUN_TASK, role=WORKER_ROLE)
configure.grant(permission="guillotina.AccessContent", role=WORKER_ROLE)
