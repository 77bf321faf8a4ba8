"""memlayer.stores: tiers (GPU, RAM, disk, SQL) and the PageStore that moves pages between them."""
