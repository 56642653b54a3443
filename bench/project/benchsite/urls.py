from django.urls import path

from benchapp import views

urlpatterns = [path("one", views.one), path("orm", views.orm)]
