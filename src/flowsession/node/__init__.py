"""What runs on a Ray cluster node, inside a session actor (``actor.SessionActor``), in Ray's
own interpreter: a small control plane of the node. It builds images and environments with the
same environments service as the control plane, on a store and folders of the node's own
(``Settings.node_home``); it runs the unchanged supervisor with ``backends.compute.slots``; it
spreads a run's lines over helper actors (``runs``). It never touches the control plane's
database or disk: what it needs comes as data in its method calls, and what it gives back is
data the control plane validates (``backends.compute.boundary``)."""
