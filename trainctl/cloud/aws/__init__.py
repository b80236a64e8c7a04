"""AWS provider layer (EC2, S3, IAM, SSM, Pricing, Service Quotas) for the AWS backend.

Modules: ``context`` (clients, settings), ``errors`` (one-line typed errors), ``facts``
(lookups), ``plan`` (the pure launch plan), ``userdata`` (the boot script), ``setup``
(one-time account setup), ``launch`` (start and end machines), ``inventory`` (list, leaks,
status), ``cost`` (price x running time). boto3 is imported inside functions only.
"""
