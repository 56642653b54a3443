"""Pages of the shop, its JSON API, and the live pool statistics."""

from __future__ import annotations

import json
import os
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Count, F, Sum
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from django_postgrespool import pool_stats

from shop import poolchart, poolhistory
from shop.models import Order, Product
from shop.orders import OutOfStock, place_order

POOLED_ENGINES = ("django_postgrespool", "django_postgrespool.postgis")


@require_GET
def product_list(request: HttpRequest) -> HttpResponse:
    """List the products and the latest orders."""
    return render(
        request,
        "shop/product_list.html",
        {
            "products": Product.objects.all(),
            "orders": Order.objects.prefetch_related("lines__product")[:5],
        },
    )


@require_GET
def product_detail(request: HttpRequest, sku: str) -> HttpResponse:
    """Show one product with its order form."""
    return render(
        request, "shop/product_detail.html", {"product": get_object_or_404(Product, sku=sku)}
    )


@require_POST
def order_create(request: HttpRequest, sku: str) -> HttpResponse:
    """Place an order from the product page's form."""
    product = get_object_or_404(Product, sku=sku)
    try:
        quantity = int(request.POST.get("quantity", "1"))
    except ValueError:
        quantity = 0
    customer = request.POST.get("customer", "").strip() or "anonymous"
    if quantity < 1:
        return render(
            request, "shop/product_detail.html",
            {"product": product, "error": "Quantity must be a whole number of at least 1."},
            status=400,
        )
    try:
        order = place_order(sku, quantity, customer)
    except OutOfStock as error:
        return render(
            request, "shop/product_detail.html",
            {"product": product, "error": f"Out of stock: {error}."}, status=409,
        )
    return redirect("order_detail", order_id=order.pk)


@require_GET
def order_detail(request: HttpRequest, order_id: int) -> HttpResponse:
    """Show one order."""
    order = get_object_or_404(Order.objects.prefetch_related("lines__product"), pk=order_id)
    return render(request, "shop/order_detail.html", {"order": order})


@require_GET
def report(request: HttpRequest) -> HttpResponse:
    """Show the sales per product, read through the 'reports' alias and its own pool."""
    # One transaction, so that the totals and the rows come from one snapshot.
    with transaction.atomic(using="reports"):
        rows = (
            Product.objects.using("reports")
            .annotate(sold=Sum("lines__quantity"), orders=Count("lines__order", distinct=True))
            # Unsold products have a NULL sum, which PostgreSQL sorts first
            # in a descending order: put them last.
            .order_by(F("sold").desc(nulls_last=True), "name")
        )
        rows = list(rows)
        revenue = Order.objects.using("reports").aggregate(total=Sum("total"))["total"]
    return render(request, "shop/report.html", {"rows": rows, "revenue": revenue or 0})


@require_GET
def api_products(request: HttpRequest) -> JsonResponse:
    """Return the products as JSON."""
    products = [
        {"sku": p.sku, "name": p.name, "price": str(p.price), "stock": p.stock}
        for p in Product.objects.all()
    ]
    return JsonResponse({"products": products})


@csrf_exempt
@require_POST
def api_orders(request: HttpRequest) -> JsonResponse:
    """Place an order from a JSON body {"sku": ..., "quantity": ..., "customer": ...}."""
    try:
        body = json.loads(request.body or b"{}")
        sku, quantity = str(body["sku"]), int(body.get("quantity", 1))
        customer = str(body.get("customer") or "api")
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": "expected JSON {\"sku\": str, \"quantity\": int}"}, status=400)
    if quantity < 1:
        return JsonResponse({"error": "quantity must be at least 1"}, status=400)
    if not Product.objects.filter(sku=sku).exists():
        return JsonResponse({"error": f"no product {sku!r}"}, status=404)
    try:
        order = place_order(sku, quantity, customer)
    except OutOfStock as error:
        return JsonResponse({"error": f"out of stock: {error}"}, status=409)
    return JsonResponse({"order": order.pk, "total": str(order.total)}, status=201)


@require_GET
def api_slow_query(request: HttpRequest) -> JsonResponse:
    """Hold a connection for ?ms= milliseconds (at most 1000), to watch the pool under load."""
    try:
        ms = min(max(int(request.GET.get("ms", "100")), 0), 1000)
    except ValueError:
        return JsonResponse({"error": "ms must be a whole number"}, status=400)
    with transaction.atomic(), connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [ms / 1000])
        backend_pid = cursor.fetchone()[0]
    return JsonResponse({"slept_ms": ms, "backend_pid": backend_pid})


def _pools() -> dict[str, Any]:
    aliases = []
    for alias, settings_dict in settings.DATABASES.items():
        engine = settings_dict.get("ENGINE", "")
        aliases.append(
            {
                "alias": alias,
                "engine": engine,
                "pooled": engine in POOLED_ENGINES,
                "pools": pool_stats(alias),
            }
        )
    return {"pid": os.getpid(), "aliases": aliases}


def _card(alias: str, pools: list[dict[str, Any]]) -> dict[str, Any]:
    """What the /pool/ page shows of one alias: the gauge, the figures, the chart."""
    current = next((p for p in pools if not p.get("retired")), pools[0])
    used = sum(p["checked_out"] for p in pools)
    idle = sum(p["idle"] for p in pools)
    waiting = sum(p.get("waiting", 0) for p in pools)
    cap = current["pool_size"] + current["max_overflow"]
    status = poolchart.state(used, cap, waiting)
    samples = poolhistory.recent(alias)
    p95 = next((s.wait_p95 for s in reversed(samples) if s.wait_p95 is not None), None)
    return {
        "used": used, "idle": idle, "cap": cap, "waiting": waiting, "status": status,
        "saturation": round(100 * used / cap) if cap else 0,
        "retired": sum(1 for p in pools if p.get("retired")),
        "p": current,
        "totals": {key: sum(p[key] for p in pools) for key in (
            "checkouts", "waits", "timeouts", "opened", "recycled", "invalidated")},
        "wait_p95_ms": None if p95 is None else round(p95 * 1000, 1),
        "gauge": poolchart.gauge(used, idle, cap, current["pool_size"], status),
        "chart": poolchart.chart(samples, cap),
    }


@require_GET
def pool(request: HttpRequest) -> HttpResponse:
    """Show the live pool of every alias in this process: gauges and the last minutes."""
    try:
        refresh = min(max(int(request.GET.get("refresh", "2")), 0), 60)
    except ValueError:
        refresh = 2
    context = _pools()
    for entry in context["aliases"]:
        entry["card"] = _card(entry["alias"], entry["pools"]) if entry["pools"] else None
    interval = getattr(settings, "POSTGRESPOOL_METRICS_INTERVAL", 1.0)
    return render(request, "shop/pool.html", {**context, "refresh": refresh, "interval": interval})


@require_GET
def pool_json(request: HttpRequest) -> JsonResponse:
    """Return the live pool of every alias in this process as JSON."""
    return JsonResponse(_pools())
