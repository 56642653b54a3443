"""URLs of the shop."""

from __future__ import annotations

from django.urls import path

from shop import views

urlpatterns = [
    path("", views.product_list, name="product_list"),
    path("products/<slug:sku>/", views.product_detail, name="product_detail"),
    path("products/<slug:sku>/order/", views.order_create, name="order_create"),
    path("orders/<int:order_id>/", views.order_detail, name="order_detail"),
    path("report/", views.report, name="report"),
    path("pool/", views.pool, name="pool"),
    path("pool.json", views.pool_json, name="pool_json"),
    path("api/products/", views.api_products, name="api_products"),
    path("api/orders/", views.api_orders, name="api_orders"),
    path("api/slow-query/", views.api_slow_query, name="api_slow_query"),
]
