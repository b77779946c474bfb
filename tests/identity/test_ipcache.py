import ipaddress

from flagella.ipcache import desired_ipcache


def test_endpoint_addresses_override_host_and_cidr_entries():
    net = ipaddress.ip_network
    addr = ipaddress.ip_address
    out = desired_ipcache(
        {net("10.244.0.0/16"): 300, net("198.51.100.0/24"): 301},
        [addr("192.0.2.1"), addr("10.244.0.9")],
        [(addr("10.244.0.9"), 400), (addr("fd00:10:244::9"), 400)],
    )
    assert out[net("10.244.0.0/16")] == 300
    assert out[net("192.0.2.1/32")] == 1
    assert out[net("10.244.0.9/32")] == 400
    assert out[net("fd00:10:244::9/128")] == 400
