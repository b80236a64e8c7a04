"""RunPod: the API (GraphQL with variables; the SDK for reads), planning, and pod management.

Importing this package does not import the ``runpod`` SDK (~1.3 s); only the calls that read
pods do. Modules: ``api`` (key, transport, client), ``catalog`` (GPU offers), ``plan`` (pure
launch plans), ``startscript`` (the pod's start command and watchdog), ``pods`` (launch, watch,
list, stop, terminate, replace), ``errors``.
"""
