"""Placing an order: one transaction that locks the product, checks and takes the stock."""

from __future__ import annotations

from django.db import transaction

from shop.models import Order, OrderLine, Product


class OutOfStock(Exception):
    """The product does not have the quantity asked for."""


def place_order(sku: str, quantity: int, customer: str) -> Order:
    """Take ``quantity`` of product ``sku`` out of stock and record the order, atomically."""
    with transaction.atomic():
        # Row lock: two buyers of the last item cannot both get it.
        product = Product.objects.select_for_update().get(sku=sku)
        if product.stock < quantity:
            raise OutOfStock(f"{product.name}: {product.stock} in stock, {quantity} asked for")
        product.stock -= quantity
        product.save(update_fields=["stock"])
        order = Order.objects.create(customer=customer, total=product.price * quantity)
        OrderLine.objects.create(
            order=order, product=product, quantity=quantity, unit_price=product.price
        )
    return order
