"""The stateless matcher: it rejoins a template from k shareholders' shares
for the instant of one verification, compares, wipes and answers.

Modules: ``config`` (matcher.toml -> MatcherConfig), ``committee`` (one mTLS
channel per shareholder, parallel calls with deadlines), ``service`` (the
``Matcher`` gRPC servicer), ``metrics``, ``server`` (``serve(config) ->
Running``, process hardening), ``__main__`` (``python -m matcher``).
"""
