"""Routing: ReplayRouter (a Megatron-Core TopKRouter subclass), the evolution predictor, route
plans, the per-model routing controller, routing metrics and the routing-method table with its
strategies (``methods``, ``strategies``).

Import the Megatron-dependent parts from their modules (``megatron_pr2.routing.router``,
``megatron_pr2.routing.controller``); this package import stays free of Megatron so the
rollout side can use :mod:`megatron_pr2.routing.route_plan` alone.
"""
