"""The Ray-free half of the Serve stage (``jobs.serve``): config, keys, request decoding, limits, answers.

* :mod:`adv.serving.config`: ``ServeConfig``, the typed config of the endpoint;
* :mod:`adv.serving.keys`: API keys kept as SHA-256 hashes, reloaded when the key file changes;
* :mod:`adv.serving.preflight`: the driver's checks before deploying, and the replicas' detector config;
* :mod:`adv.serving.decode`: request bodies to images; every malformed body is a 4xx with one line;
* :mod:`adv.serving.http`: the HTTP answers (key check, 4xx/429/503 bodies, a request's outcome as a response)
  and the proxy middleware that turns a lost replica into 503;
* :mod:`adv.serving.ledger`: per-key rate limits, quotas and alarm counts;
* :mod:`adv.serving.owner`: the detector state owner (write-ahead durable);
* :mod:`adv.serving.respond`: response bodies, the same shape flagged or not;
* :mod:`adv.serving.client`: an HTTP client and the counted HTTP oracle the red-team harness attacks through.
"""

from adv.serving.config import Limits, RateLimit, Scaling, ServeConfig
from adv.serving.decode import RequestError, decode
from adv.serving.keys import KeyRing, hash_key
from adv.serving.ledger import Ledger

__all__ = ["KeyRing", "Ledger", "Limits", "RateLimit", "RequestError", "Scaling", "ServeConfig", "decode",
           "hash_key"]
