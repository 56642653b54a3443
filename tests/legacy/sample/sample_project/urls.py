from django.conf.urls import patterns, url

urlpatterns = patterns(
    "notes.views",
    url(r"^pid/$", "pid"),
    url(r"^leave-open/$", "leave_open"),
    url(r"^count/$", "count"),
)
