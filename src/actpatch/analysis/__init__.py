"""What the numbers mean: head characterisation and classes, the account of the gap, the IOI analysis summary,
and the checks that audit them."""
